"""RL from preferences on control tasks (Christiano et al. 2017) and TAMER (Knox & Stone 2009): docs/control.md.

Modules: envs (gymnasium environments by id), segments and clips, reward_model (the ensemble),
queries (which pairs, how many labels when), labelers (synthetic) and human (people, through
files the web app reads), wrapper (the agent's learned reward), train (``kilter control``),
tamer (``kilter tamer``).  Nothing here imports the LM trainers or the web app.
"""
