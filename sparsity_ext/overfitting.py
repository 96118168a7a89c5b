"""Placeholder (being written)."""
from dataclasses import dataclass, asdict
@dataclass
class OverfittingWarning:
    sparsity_rise_epoch: object = None
    test_loss_min_epoch: object = None
    message: str = ""
    def as_dict(self): return asdict(self)
def overfitting_warning(history, metrics, split="test"):
    return OverfittingWarning(None, int(metrics.loc[metrics.test_loss.idxmin(), "epoch"]), "tbd")
