"""Per-window NLL sums and scored-token counts of a document, stored compactly in a record.

A record's document entry keeps its windows' sums (in window order) as
``"windows": {"nll": <base64 of float64 little-endian>, "tokens": <base64 of int32
little-endian>}`` — about 21 characters per window instead of a JSON list of floats.
``scca-eval compare`` resamples blocks of consecutive windows from them when a cell has too
few documents for a test over documents (a single long document or a token stream).
"""

from __future__ import annotations

import base64

import numpy as np

from ..errors import UserError


def encode_windows(nll: np.ndarray, tokens: np.ndarray) -> dict:
    return {
        "nll": base64.b64encode(np.asarray(nll, dtype="<f8").tobytes()).decode("ascii"),
        "tokens": base64.b64encode(np.asarray(tokens, dtype="<i4").tobytes()).decode("ascii"),
    }


def decode_windows(entry: dict, where: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(nll sums, token counts) of a document entry, or None when the record has none
    (records made before they were kept). A damaged entry is refused."""
    windows = entry.get("windows")
    if windows is None:
        return None
    try:
        nll = np.frombuffer(base64.b64decode(windows["nll"], validate=True), dtype="<f8").astype(np.float64)
        tokens = np.frombuffer(base64.b64decode(windows["tokens"], validate=True), dtype="<i4").astype(np.int64)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{where}: its per-window sums cannot be read ({type(error).__name__}); "
                        "evaluate it again") from None
    if len(nll) != len(tokens) or int(tokens.sum()) != int(entry["tokens"]) or not np.all(np.isfinite(nll)):
        raise UserError(f"{where}: its per-window sums do not add up to the document's; evaluate it again")
    return nll, tokens
