from vlpet_cli.cli import main

main()
