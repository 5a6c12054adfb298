"""The PDT dataset build: preflight → plans → notes → collate → export, resumable and byte-reproducible.

What it is: one module per stage, the offline extractive teacher, the shared on-disk layout
(`layout`), the `openai_compatible` teacher (plan items over HTTP) and the `pipeline` that runs
the stages as a job. What it is not: the trainer's data loader (`pdt.data.loader`).
"""
