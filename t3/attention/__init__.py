"""T3 multi-scale window attention: plans, schedules, the op and its dense masked reference."""

from t3.attention.backends import BACKENDS, choose_backend, flash_available
from t3.attention.index import GroupIndex, group_ids, group_index
from t3.attention.op import grouped_attention, t3_attention
from t3.attention.plan import BRANCHES, DENSE_PLAN, Branch, Grid, PlanError, WindowPlan, effective_branches
from t3.attention.schedule import (
    PRESETS,
    LayerPlan,
    LayerRule,
    MadeFor,
    Padding,
    Schedule,
    build_schedule,
    get_schedule,
    windows_from_pieces,
)

__all__ = [
    "BACKENDS",
    "BRANCHES",
    "DENSE_PLAN",
    "PRESETS",
    "Branch",
    "Grid",
    "GroupIndex",
    "LayerPlan",
    "LayerRule",
    "MadeFor",
    "Padding",
    "PlanError",
    "Schedule",
    "WindowPlan",
    "build_schedule",
    "choose_backend",
    "effective_branches",
    "flash_available",
    "get_schedule",
    "group_ids",
    "grouped_attention",
    "group_index",
    "t3_attention",
    "windows_from_pieces",
]
