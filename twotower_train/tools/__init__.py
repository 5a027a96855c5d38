"""Tools beside the library: ``bench`` (speed and memory), ``bench_compare`` (this checkout
against a git ref), ``bench_decode`` (decoding speed), ``distill_data`` (the backbone's own
continuations as a data source). Each is ``python -m twotower_train.tools.NAME``."""
