"""argparse value types shared by the `jllm` command and `jllm serve`: each checks its value while
the command line is parsed, so a bad flag fails before any model loads."""
import argparse
import math


def number(kind, ok, expected: str):
    """A type parsing `kind` (int or float) that must be finite with ok(value) true; the error
    names what was expected and what was given."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    return parse


positive_int = number(int, lambda x: x >= 1, "an int >= 1")
non_negative_int = number(int, lambda x: x >= 0, "an int >= 0")
positive_float = number(float, lambda x: x > 0, "a number > 0")
non_negative_float = number(float, lambda x: x >= 0, "a number >= 0")
probability = number(float, lambda x: 0 < x <= 1, "a number in (0, 1]")
unit_interval = number(float, lambda x: 0 <= x <= 1, "a number in [0, 1]")
seed = number(int, lambda x: 0 <= x < 2 ** 32, "an int in [0, 2**32)")
penalty = number(float, lambda x: -2 <= x <= 2, "a number in [-2, 2]")
repetition_penalty = number(float, lambda x: 0.01 <= x <= 100, "a number in [0.01, 100] (1 is no penalty)")
logprobs = number(int, lambda x: 0 <= x <= 20, "an int in [0, 20]")


def logit_bias_entry(text: str) -> tuple[int, float]:
    """ID=BIAS: a token id (an int >= 0) and a bias in [-100, 100] added to its logit."""
    tid, _, bias = text.partition("=")
    try:
        tid, bias = int(tid), float(bias)
    except ValueError:
        tid, bias = -1, math.nan
    if tid < 0 or not -100 <= bias <= 100:
        raise argparse.ArgumentTypeError(
            f"expected TOKEN_ID=BIAS (an int >= 0 and a bias in [-100, 100], e.g. 13=-100), got {text!r}")
    return tid, bias


DEVICE_MEMORY_HELP = ("share of each GPU that JAX may take, weights and KV pages included (default 0.9; "
                      "JAX's own default is 0.75; XLA_PYTHON_CLIENT_MEM_FRACTION or XLA_CLIENT_MEM_FRACTION "
                      "in the environment wins)")
