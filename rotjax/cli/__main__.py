from rotjax._launch import entry

entry()
