"""Tooling built on the library: benchmarks, the paper reproduction and the codec fuzzer.

Nothing in :mod:`fedquant.quant`, :mod:`fedquant.fl` or :mod:`fedquant.flower`
imports this package; it sits on top of them, beside the command line.
"""
