def plot_run(out): pass
