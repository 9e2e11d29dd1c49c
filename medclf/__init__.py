"""medclf: from a labelled set of medical images to a trained, evaluated, explained classifier."""
from .config import TrainConfig
from .errors import MedclfError
from .evaluate import evaluate, predict
from .train import train

__version__ = "0.1.0"
__all__ = ["train", "evaluate", "predict", "TrainConfig", "MedclfError", "__version__"]
