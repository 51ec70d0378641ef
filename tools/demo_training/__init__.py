"""The pieces of tools/train_demo_model.py: the scene code and its prompts, the packed language
model, the training loop, the vision stage."""
