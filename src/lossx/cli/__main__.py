from lossx.cli import main

main()
