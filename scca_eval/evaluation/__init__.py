"""Evaluation: a model under a pattern, scored on (task, ctx) cells, and the records it writes.

``scca_eval.evaluate`` (``api.py``) runs the cells; this package is how each one is scored.
One job per module:

- ``settings.py``: ``EvalSettings``, every setting of an evaluation in one frozen object
- ``protocols.py``: the protocols (stride, lm-eval, longlora) as objects
- ``windows.py``: the protocols' windows (default, lm-eval's, LongLoRA's)
- ``lm_eval_protocol.py``: lm-eval's prefix token and encoding for ``--protocol lm-eval``
- ``engine.py``: windows through the model in batches, the chunked loss, ``--compile``
- ``cells.py``: one (task, ctx) cell, resumable and data parallel, into its record
- ``resume.py``: progress files, so that a stopped cell continues
- ``cost.py``: what a cell will cost, said before it starts
- ``metrics.py``: perplexity, bits per byte, word perplexity, bootstrap intervals
- ``window_sums.py``: per-window NLL sums and counts in a record, compactly
- ``sweep.py``: the grid models × tasks × patterns × ctx, resumable
- ``passkey.py``: passkey retrieval trials and their records
- ``lm_eval_adapter.py``: lm-eval's HF model class over a scca-eval model (``scca-eval``)

Nothing is imported here, so that importing one module (``metrics`` for ``compare``, say)
does not pull in torch.
"""
