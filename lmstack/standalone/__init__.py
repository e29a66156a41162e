"""Programs that run without lmstack: `run.py` is the code half of `lmstack export twofile`
(numpy only; it imports nothing from lmstack). A package so that run.py ships with lmstack."""
