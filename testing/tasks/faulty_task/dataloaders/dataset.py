from experiments.synthetic.dataloaders.dataset import GaussianClusters as _Clusters


class Data(_Clusters):
    pass
