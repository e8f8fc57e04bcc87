"""jaxpoison: data-poisoning research in JAX.

A trial (craft poisons, train a victim, evaluate) is a pure function of arrays and
PRNG keys, so a sweep of many trials is one jit-compiled, vmapped, sharded program.
"""

from jaxpoison.errors import UserInputError

__all__ = ["UserInputError"]
__version__ = "0.1.0"
