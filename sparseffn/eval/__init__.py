"""Quality evaluation: perplexity, two accuracy tasks from held-out text, sweeps and plots."""
from sparseffn.eval.perplexity import perplexity
from sparseffn.eval.tasks import LastWordTask, NextSentenceTask, build_tasks

__all__ = ["LastWordTask", "NextSentenceTask", "build_tasks", "perplexity"]
