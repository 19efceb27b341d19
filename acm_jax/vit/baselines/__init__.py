"""Baselines of the ViT family, each converting the same dense ViT: static width,
MoEfication, early exits, token halting (`runs` trains and evaluates them for
`experiments.compare`)."""
