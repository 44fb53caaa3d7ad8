"""Real-world adapters the stages import (hub benchmarks, an LLM judge, real datasets): plumbing a
tutorial reader can skip."""
