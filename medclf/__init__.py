"""medclf: from a labelled set of medical images to a trained, evaluated, explained classifier."""
from .compare import compare
from .config import TrainConfig
from .errors import MedclfError
from .evaluate import evaluate, predict
from .explain import explain
from .plan import plan
from .reporting.run_report import report
from .train import train

__version__ = "0.1.0"
__all__ = ["train", "plan", "evaluate", "predict", "compare", "report", "explain", "TrainConfig", "MedclfError", "__version__"]
