"""t3: retrofit pretrained video diffusion transformers for native 4K with T3 window attention."""

from t3.attention import Schedule, WindowPlan, get_schedule, t3_attention
from t3.transform import transform, untransform

__version__ = "0.1.0"

__all__ = [
    "Schedule",
    "WindowPlan",
    "__version__",
    "get_schedule",
    "t3_attention",
    "transform",
    "untransform",
]
