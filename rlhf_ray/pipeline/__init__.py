"""Several jobs run as one: today the demo (`demo.py`: SFT, a reward model,
DPO, PPO and ReMax on the shipped tiny task, then its report)."""
