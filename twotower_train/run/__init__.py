"""The run: compose config -> data -> model -> objective -> engine -> loop -> evaluate ->
export, and own its lifecycle (``train.py``); ``mode=plan`` (``plan.py``); the metrics sinks
(``metrics.py``)."""
