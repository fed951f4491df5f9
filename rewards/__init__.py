"""Rewards: the Reward protocol, built-ins, the plug-in loader and the RewardServer actor."""
