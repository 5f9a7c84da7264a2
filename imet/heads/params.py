"""Head parameters declared once, with the head: the default in its constructor's signature (as in
scikit-learn), the constraint and one line of help in its `params` (name -> Param, merged along the
class hierarchy, a subclass overriding a parent's entry).

From these come `get_params`/`set_params`, the checks of `Head.validate` (errors name the parameter,
never a command-line flag) and the options of `imet fit`, help and defaults included. The constraint
types live in `imet.params` (featurize and the codec declare their settings with them too).
"""

from imet.params import LABELS, SEED, WORKERS, Bool, Bound, Choice, Float, Int, Param, ParamError, Text, check_values

__all__ = ["LABELS", "SEED", "WORKERS", "Bool", "Bound", "Choice", "Float", "Int", "Param", "ParamError", "Text",
           "check_values"]
