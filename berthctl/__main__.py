from berthctl.main import main

main()
