"""Lightning callbacks and the plain measurement functions they wrap.

The pure algorithms (Hessian spectrum, adversarial attacks) live in Lightning-free modules
and can be used on any ``nn.Module``; each callback is a thin wrapper in its own file.
"""
