"""Planning: scores and targets in, a plan (plain data) out: allocation, GQA units, latency tables and searches."""
