"""Write ``reference_mrvi_signatures.json``: the public method signatures (names, order, kinds,
defaults) of scvi-tools' torch MRVI, which ``tests/test_api_parity.py`` holds ours against.

Run it with an environment that has scvi-tools (the reference is not a dependency of ours)::

    python tests/data/make_reference_signatures.py

:func:`describe` is also what the test applies to :class:`mrvi_pyro.MRVI`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

OUTPUT = Path(__file__).with_name("reference_mrvi_signatures.json")


def _default(value):
    """A default as JSON: plain values as they are, anything else as its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return {"repr": repr(value)}


def describe(cls) -> dict:
    """{method name: [{"name", "kind", "default"?}, ...]} of the public methods of ``cls``
    (``__init__`` included, ``self``/``cls`` left out)."""
    table = {}
    for name in sorted(["__init__"] + [n for n in dir(cls) if not n.startswith("_")]):
        member = getattr(cls, name)
        if not callable(member) or isinstance(member, type):
            continue
        parameters = []
        for parameter in inspect.signature(member).parameters.values():
            if parameter.name in ("self", "cls"):
                continue
            entry = {"name": parameter.name, "kind": parameter.kind.name}
            if parameter.default is not inspect.Parameter.empty:
                entry["default"] = _default(parameter.default)
            parameters.append(entry)
        table[name] = parameters
    return table


def main() -> None:
    import warnings

    warnings.simplefilter("ignore")
    import scvi
    from scvi.external.mrvi_torch import TorchMRVI

    snapshot = {
        "source": f"scvi-tools {scvi.__version__}, scvi.external.mrvi_torch.TorchMRVI "
                  "(the torch backend of scvi.external.MRVI)",
        "methods": describe(TorchMRVI),
    }
    OUTPUT.write_text(json.dumps(snapshot, indent=1) + "\n")
    print(f"wrote {OUTPUT} ({len(snapshot['methods'])} methods)")


if __name__ == "__main__":
    main()
