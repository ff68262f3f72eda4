from dalle_lesson.cli import main

main()
