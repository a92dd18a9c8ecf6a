from experiments.synthetic.dataloaders.dataset import GaussianClusters as _G
class Data(_G):
    pass
