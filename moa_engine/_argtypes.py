"""argparse types shared by the `moa` subcommands."""

from __future__ import annotations

import argparse


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def experts_arg(values):
    """--experts: one MoA directory, or NAME=PEFT_DIR pairs."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    named = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--experts: expected one MoA directory or NAME=PEFT_DIR pairs, got {value!r}")
        named[name] = path
    return named
