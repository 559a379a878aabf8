"""Session-wide test setup."""

import os
import tempfile

# Latency tables are cached on disk between runs (hf_prune.planning.latency_cache.latency_cache_dir); tests must neither
# write into the user's cache nor read a table measured outside them.
os.environ["HF_PRUNE_LATENCY_CACHE"] = tempfile.mkdtemp(prefix="hf_prune-test-latency-")
