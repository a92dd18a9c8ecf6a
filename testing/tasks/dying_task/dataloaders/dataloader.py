from experiments.synthetic.dataloaders.dataloader import SyntheticLoader as _L
class Loader(_L):
    pass
