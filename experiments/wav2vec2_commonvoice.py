"""ACMize a Wav2Vec2 CTC model: pretrain (or --init), distill, gates, finetune, static, eval.

The driver is `acm_jax.cli` (shared with experiments.vit_imagenet); --help lists every flag.
"""

import sys

from acm_jax import cli


def main(argv: list[str] | None = None) -> int:
  return cli.main("wav2vec2", argv)


if __name__ == "__main__":
  sys.exit(main())
