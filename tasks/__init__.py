"""What is optimised and measured: base models, prompt sets, rewards and the toy world."""
