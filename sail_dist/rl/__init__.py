"""RL for the thinking stages: rewards, judges, the episode loop, pass@k filtering and rejection sampling."""
