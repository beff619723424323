"""The runtime: the model and stream types users hold, and what runs them.

model.py: a stack of recurrent layers (layers.py) run by the C stack directly;
graph.py: a converted graph planned into a C program (the planner dispatches every node to
rnnengine.ops) and run by the C graph executor.
"""
