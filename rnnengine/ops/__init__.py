"""The op registry: one handler per ONNX op, its NumPy semantics (``eval``, used to fold
constants and as the reference) beside its lowering to the C executor (``emit``).

handlers.py holds the handlers and ``OPS`` (op type -> handler class); streaming.py holds,
per op, the rule that decides whether it can run chunk by chunk exactly; codes.py holds the
numbers shared with the C core (src_c/rnnengine.h) and the recurrent ops' tables, once.
"""
