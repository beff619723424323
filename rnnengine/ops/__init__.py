"""The op registry: one handler per ONNX op, its NumPy semantics (``eval``, used to fold
constants and as the reference) beside its lowering to the C executor (``emit``).

handlers.py holds the tensor ops and ``OPS`` (op type -> handler class); control.py holds
If, Loop and the sequence ops, registered in the same ``OPS``; streaming.py holds, per op,
the rule that decides whether it can run chunk by chunk exactly. ``PlannerInterface``
(handlers.py) is what a handler may call on the planner. ``OPS`` is the one answer to
"which ops does rnnengine run": the converter, the weight-file checks and the planner all
read it. The numbers shared with the C core (src_c/rnnengine.h) and the recurrent ops' tables
are in rnnengine/codes.py, once.
"""
from rnnengine.ops import control, handlers
from rnnengine.ops.control import SEQUENCE_INPUTS, SEQUENCE_OPS, EnvHandler
from rnnengine.ops.handlers import (KERAS_LOOP, ROWS_VIEW, rows_view_errors, ONNX_DTYPE, OPS, STATELESS, STEP_MASK, Handler, PlannerInterface, Recurrent,
                                    register)

__all__ = ["OPS", "Handler", "EnvHandler", "PlannerInterface", "Recurrent", "register", "ONNX_DTYPE",
           "SEQUENCE_OPS", "SEQUENCE_INPUTS", "STATELESS", "STEP_MASK", "KERAS_LOOP", "ROWS_VIEW", "rows_view_errors", "control", "handlers"]
