"""ACMize a Vision Transformer: pretrain (or --init), distill, gates, finetune, static, eval.

The driver is `acm_jax.cli` (shared with experiments.wav2vec2_commonvoice); --help lists every flag.
"""

import sys

from acm_jax import cli


def main(argv: list[str] | None = None) -> int:
  return cli.main("vit", argv)


if __name__ == "__main__":
  sys.exit(main())
