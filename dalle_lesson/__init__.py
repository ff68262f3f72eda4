"""dalle_lesson: DALL·E built step by step, one module per idea, in course order.

data -> vae -> dvae -> bpe -> attention -> dalle -> sampling -> clip -> train -> cli
"""

__version__ = "0.1.0"
