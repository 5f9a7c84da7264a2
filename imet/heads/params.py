"""The parameter declarations heads use (imet.params), under the name heads have always imported them by."""

from imet.params import (  # noqa: F401
    FLOAT32_MAX,
    LABELS,
    SEED,
    WORKERS,
    Bool,
    Bound,
    Choice,
    Constraint,
    Float,
    Int,
    Param,
    ParamError,
    Text,
    check_values,
)

__all__ = ["LABELS", "SEED", "WORKERS", "Bool", "Bound", "Choice", "Float", "Int", "Param", "ParamError", "Text",
           "check_values"]
