from experiments.synthetic.dataloaders.dataloader import SyntheticLoader as _Loader


class Loader(_Loader):
    pass
