"""The PDT dataset build: preflight → plans → notes → collate → export, resumable and byte-reproducible.

What it is: one module per stage, the offline extractive teacher, the shared on-disk layout
(`layout`) and the `pipeline` that runs the stages as a job. What it is not: the trainer's data
loader (`pdt.data.loader`) nor any network teacher (the `openai_compatible` teacher is preset
schema only so far).
"""
