"""Checks CloudEvents 1.0 JSON envelopes with the CloudEvents Python SDK (an implementation
independent of outboxd's): one envelope per line on stdin. The SDK validates the required
attributes, the optional ones (a `subject` or `datacontenttype` must not be empty, `time` is
an RFC 3339 time) and the names of extension attributes; `traceparent`, an extension the SDK
leaves alone, is checked against W3C Trace Context here. Prints one line per envelope that
fails ("<line number>: <why>") and exits 1 if any did; else prints "ok <count>"."""
import re
import sys

from cloudevents.core.formats.json import JSONFormat

TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def traceparent_problem(value):
    if not isinstance(value, str):
        return "traceparent is not a string"
    m = TRACEPARENT.match(value)
    if not m:
        return f"traceparent {value!r} is not version-traceid-parentid-flags in lowercase hex"
    version, trace_id, parent_id, _, rest = m.groups()
    if version == "ff":
        return "traceparent version ff is invalid"
    if version == "00" and rest is not None:
        return "traceparent version 00 carries more than 55 characters"
    if set(trace_id) == {"0"} or set(parent_id) == {"0"}:
        return "traceparent trace-id or parent-id is all zeros"
    return None


def main():
    failures = 0
    count = 0
    fmt = JSONFormat()
    for number, line in enumerate(sys.stdin, start=1):
        line = line.strip()
        if not line:
            continue
        count += 1
        try:
            event = fmt.read(None, line)
            problem = None
            attributes = event.get_attributes()
            if "traceparent" in attributes:
                problem = traceparent_problem(attributes["traceparent"])
            if event.get_specversion() != "1.0":
                problem = f"specversion {event.get_specversion()!r}"
        except Exception as e:  # the SDK's validation errors and JSON errors alike
            problem = f"{type(e).__name__}: {e}"
        if problem:
            failures += 1
            print(f"{number}: {problem}")
    if failures:
        sys.exit(1)
    print(f"ok {count}")


if __name__ == "__main__":
    main()
