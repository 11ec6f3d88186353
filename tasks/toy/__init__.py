"""The toy world: procedural coloured-shape images with exact verifiers, and tiny diffusion models of it.

`world` renders images from prompts, `verify` checks an image against its prompt, `pipeline` holds the
diffusers pipeline class of `toy-base` / `toy-turbo`, and `train` the recipe that builds their weights.
"""
