"""localtune: fine-tune a language model with LoRA / QLoRA on the machine in front of you.

The flow (see README.md): probe the hardware (`hardware`), pick a profile and fit the plan to
the machine's memory (`profiles`, `memory`, `plan`), then train, follow and export.
Core modules never import the terminal UI.
"""

__version__ = "0.1.0"
