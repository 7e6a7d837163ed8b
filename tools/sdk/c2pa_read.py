"""Prints a file's C2PA manifest store as JSON, read and validated by the
C2PA SDK's own Python bindings (c2pa-python): the gateway tests' reader of
our content credentials that shares no code with ours.

    python c2pa_read.py VIDEO.mp4
"""

import sys

import c2pa


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: c2pa_read.py FILE")
    with c2pa.Reader(sys.argv[1]) as reader:
        print(reader.json())


if __name__ == "__main__":
    main()
