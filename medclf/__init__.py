"""medclf: from a labelled set of medical images to a trained, evaluated, explained classifier."""
from .comparison import compare
from .config import TrainConfig
from .doctor import doctor
from .errors import MedclfError
from .evaluation import evaluate, predict
from .explanation import explain
from .exporting import export
from .planning import plan
from .reporting.run_report import report
from .training import train
from .tuning import tune

__version__ = "0.1.0"
__all__ = ["train", "tune", "plan", "doctor", "evaluate", "predict", "compare", "report", "explain", "export", "TrainConfig", "MedclfError", "__version__"]
