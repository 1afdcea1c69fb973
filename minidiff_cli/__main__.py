from minidiff_cli.cli.app import main

main()
