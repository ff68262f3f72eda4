"""dalle_lesson: DALL·E built step by step, one module per idea, in course order.

    data         the three datasets (shapes with a held-out split, emoji, your folder)   lesson 00
    vae          autoencoder -> VAE: ELBO, reparameterisation, KL                         lesson 01
    dvae         the discrete VAE: Gumbel-softmax, KL to uniform, logit-Laplace           lesson 02
    vqvae        the VQ-VAE beside it: nearest code, straight-through, commitment         lesson 02
    bpe          byte-pair encoding, CLIP's tokenizer, DALL·E's per-position padding      lesson 03
    attention    causal, row, column and convolutional masks; block-sparse attention      lesson 04
    dalle        the transformer over [text ; image] and its 1/8 + 7/8 loss               lesson 04
    sampling     token by token with a KV cache; temperature, top-k, top-p, guidance      lesson 05
    pipeline     caption -> tokens -> codes -> pixels, the whole thing                    lesson 05
    clip         a small CLIP (open_clip's model and loss): zero-shot, reranking         lesson 06
    evaluate     the scorer: reads a Shapes picture against its caption, per attribute  lesson 06
    openai_dvae  OpenAI's released dVAE weights, read without running pickled code        lesson 07
    plan         the paper's model on paper: parameters, memory per GPU, FLOPs, time      lesson 07
    shards       WebDataset tar shards of images or of dVAE codes, one share per process  lesson 07
    clip_guided  CLIP-guided generation: optimise dVAE codes until CLIP agrees            lesson 08
    unclip       DALL·E 2's ideas: retrieval, slerp, text diffs, a decoder and a prior    lesson 08

Beneath them, ``checkpoint`` (one safetensors format for every model) and ``viz`` (plots).
Above them, ``train`` (the one training engine: one process, DDP or FSDP), ``stages`` (each stage as something the
engine trains) and ``cli`` (every command-line parser). Imports run one way: model
modules never import ``train``, ``stages`` or ``cli``. Beside them, ``exercises``: one module
of checkers per lesson (``exercises.lesson04``) for the exercises that end each notebook.
"""

__version__ = "0.2.0"
