"""Celery's own `saferepr` for each case of a JSON-lines file (peer of wire/tests/saferepr_parity.rs).

Usage: python saferepr_cases.py CASES.jsonl   (or cases on stdin)

Each input line is one JSON object (parsed with `json.loads`, so `1.0` stays a float, object keys keep their
order and bare NaN/Infinity load as floats):
* `{"value": V, "maxlen": N|null, "maxlevels": L, "tuple": bool}` prints
  `celery.utils.saferepr.saferepr(V, maxlen=N, maxlevels=L)`, with V turned into a tuple when `tuple` is true;
* `{"task": true, "args": [...], "kwargs": {...}}` prints `[argsrepr, kwargsrepr]` as Celery's real
  `app.amqp.as_task_v2` puts them into the headers of a task message (args given as a tuple, as
  `Task.delay(*args)` does).

Each output line is the JSON encoding of the result (reprs may contain raw newlines), one per input line.
"""
import json
import sys

from celery import Celery
from celery.utils.saferepr import saferepr


def main() -> None:
    source = open(sys.argv[1], encoding="utf-8") if len(sys.argv) > 1 else sys.stdin
    app = None
    out = []
    with source:
        for line in source:
            if not line.strip():
                continue
            case = json.loads(line)
            if case.get("task"):
                if app is None:
                    app = Celery("saferepr_cases", broker="memory://", backend="cache+memory://")
                msg = app.amqp.as_task_v2(
                    "00000000-0000-0000-0000-000000000000",
                    "saferepr.case",
                    args=tuple(case["args"]),
                    kwargs=case["kwargs"],
                )
                result = [msg.headers["argsrepr"], msg.headers["kwargsrepr"]]
            else:
                value = case["value"]
                if case.get("tuple"):
                    value = tuple(value)
                result = saferepr(value, maxlen=case["maxlen"], maxlevels=case["maxlevels"])
            out.append(json.dumps(result))
    sys.stdout.write("\n".join(out) + ("\n" if out else ""))


if __name__ == "__main__":
    main()
