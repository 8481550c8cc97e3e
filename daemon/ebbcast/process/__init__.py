"""The main process over the serving processes: the arbiter of workers and
signals, upgrades, the listeners, sd_notify, the admin listener and the roles a
serving process is handed. Never imports ``ebbcast.serving``."""
